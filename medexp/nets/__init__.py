"""Networks MONAI lacks. Everything else is a MONAI class named in a model YAML."""
