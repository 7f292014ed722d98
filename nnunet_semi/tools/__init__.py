"""Tools around the trainers: demo, set-up example, synthetic datasets, export, benchmark, offline wheels."""
