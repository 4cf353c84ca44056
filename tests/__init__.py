# A regular package, so that `tests.layers` resolves here even where an installed distribution
# (hershey-fonts ships a top-level `tests`) puts a package of that name on sys.path.
