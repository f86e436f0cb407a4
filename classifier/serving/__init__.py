"""The shared inference service: one process per host (or per GPU) that
batches the model calls of every front-end worker (README "Inference service")."""
