//! Rebuilds when a migration is added: `sqlx::migrate!` embeds the files of `migrations/`,
//! and cargo tracks only the files it saw at the last build.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
