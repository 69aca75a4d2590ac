"""Model runtimes: one module per framework, all behind `runtimes.base.ModelRuntime`."""
