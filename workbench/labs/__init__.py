"""Lab logic for the notebooks: what each lab trains and how it judges the result, as tested code."""
