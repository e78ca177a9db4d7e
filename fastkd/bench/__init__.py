"""fastkd's benchmark suite: providers, measurement, reports (`fastkd-bench`)."""
