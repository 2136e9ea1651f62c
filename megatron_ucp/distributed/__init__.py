"""Process groups, launch helpers and the tensor-parallel RNG tracker."""
