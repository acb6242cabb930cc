"""The math, importing nothing of the package but its errors: bases, projection, fused layouts."""
