"""The small core every step shares: config, schema (statuses and columns), the run layout, the step contract, fingerprints, atomic I/O."""
