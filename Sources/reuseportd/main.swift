print("reuseportd: not yet")
