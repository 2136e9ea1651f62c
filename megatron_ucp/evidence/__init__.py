"""Evidence that checkpoint conversions lose nothing: loss-curve comparisons and their reports."""
