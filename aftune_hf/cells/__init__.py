"""Layer-block cells (issue 19, in progress): re-execute one block of decoder layers for one step."""
