"""Text-side helpers shared by the methods: class-list checks, prompt building, token spans."""
