# Broker settings shared by scripts/services (Kafka on the host) and docker/kafka/start (the
# image): what a tally broker needs besides its listeners and paths. Sourced, not run.
#
# kafka_settings REPLICAS: the property lines for a single node (1) or a 3-node cluster (3).
kafka_settings() {
  local replicas=$1 isr
  if [[ $replicas == 1 ]]; then isr=1; else isr=$((replicas - 1)); fi
  cat <<SETTINGS
# Internal topics and tally's topics on $replicas node(s). With one node they cannot have three
# replicas: without these, transactional producers never find a coordinator and consumer groups
# never get one. With three, losing one node loses nothing and stops nothing.
default.replication.factor=$replicas
min.insync.replicas=$isr
offsets.topic.replication.factor=$replicas
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=$replicas
transaction.state.log.min.isr=$isr
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=$replicas
share.coordinator.state.topic.min.isr=$isr
# An out-of-sync replica never becomes leader: no acknowledged write is lost.
unclean.leader.election.enable=false
group.initial.rebalance.delay.ms=0
# tally creates its topics itself (partition counts matter for co-partitioning); a typo in a
# topic name must fail, not create a stray topic.
auto.create.topics.enable=false
num.partitions=1
SETTINGS
}
