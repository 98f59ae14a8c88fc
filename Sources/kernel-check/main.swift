print("kernel-check: not yet")
