"""The only place Ray's API is used: runtime start-up, Data pipelines, Train and Tune wiring."""
