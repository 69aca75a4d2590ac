"""Hardware-in-the-loop harness."""
