"""Herald: a Kafka-native notification pipeline."""
