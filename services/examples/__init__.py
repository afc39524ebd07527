"""Example workflows that `conveyor up` serves and the tests run."""
