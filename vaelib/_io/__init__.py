"""Private file I/O: atomic writes, a lock on a run, the checks of a model file's archive and downloads."""
