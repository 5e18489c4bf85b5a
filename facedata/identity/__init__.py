"""The identity step (run-wide): k-NN graph, clusters, cleaning, opt-out and splits."""
