"""Writing checkpoints: converting between weight formats (convert) and building random ones of any
config for tests and benchmarks (synthetic). The reading side is the runtime's loader (dsv3.core.loader)."""
