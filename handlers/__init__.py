"""TorchServe serving of bookrec: archive builder, handler, request schema and serving engine."""
