def optimize(m, backend="auto"): raise NotImplementedError
def restore(m): raise NotImplementedError
