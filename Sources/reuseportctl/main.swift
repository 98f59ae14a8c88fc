print("reuseportctl: not yet")
