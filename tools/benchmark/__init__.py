"""`tools/bench`: Conveyor's latency, throughput, footprint and recovery beside the floor that
the broker and the workflow library set, measured on both brokers in one run."""
