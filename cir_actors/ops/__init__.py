"""Operations: where each role runs on a cluster, the local Ray head, and the Prometheus metrics."""
