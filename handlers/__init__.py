"""The TorchServe worker code of bookrec: handler, request schema, engine, serving metrics, drift sample."""
