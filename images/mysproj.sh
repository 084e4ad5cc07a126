#!/bin/sh
# `mysproj` in the images: the package lives in /app (PYTHONPATH), not installed into the venv.
exec python -m mysproj "$@"
