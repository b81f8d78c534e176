"""`minigpt5 train`, stages 1 and 2 (the scratch stages live in `toyworld`)."""
