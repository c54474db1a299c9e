"""What the tests share and that holds no tests: tiny models, attention cases, tolerances, comparisons, paths."""
