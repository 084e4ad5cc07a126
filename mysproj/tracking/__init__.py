"""Where a run's numbers go besides its manifests: TensorBoard event files inside each stage output (on by
default). A tracking library is imported only by a stage that logs to it."""
