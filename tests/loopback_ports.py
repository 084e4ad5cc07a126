"""Free TCP ports on 127.0.0.1 for the servers tests start (a plain module: test files import it by name, which
they cannot do with a conftest when several exist). The same helper the benchmarks' S3 server picks its ports with."""

from mysproj.bench.s3_server import free_ports

__all__ = ["free_ports"]
