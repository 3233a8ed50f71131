"""Performance tools: throughput and MFU (`bench`, `ff-jax bench`) and the ahead-of-time memory
plan of a run's steps (`plan`, `ff-jax plan`)."""
