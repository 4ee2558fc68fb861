"""`gpu-broker sizing`: how many GPUs the team's measured demand needs, and when the rest of
the week could be rented. Pure computation in week.py, usage.py, windows.py and verdict.py;
reading the ledger in build.py; output in render.py; the command in command.py."""
