"""The SQL study and the workers that fill it: storage, budget, arms, confirmation runs."""
