"""Kubernetes face of the pipeline: the controller that runs the DAG as Jobs, and `mysproj status` / `logs`.
Imports only config, storage, layout and the DAG: it runs in the slim CPU image (no torch, no transformers)."""
