"""`mysproj bench`: throughput, MFU and peak memory of the stages beside the plain-transformers baseline
(method: docs/performance.md; records: benchmarks/)."""
