"""`mysproj bench`: throughput, MFU and peak memory of the stages beside the plain-transformers baseline
(see NOTES.md in this folder)."""
