"""The privacy-utility planner (SPEC §3.5): :mod:`~fedpeft.planning.forecast` is its maths and
measured candidates (no IO, usable by the server), :mod:`~fedpeft.planning.auto` reads data and
builds models to plan a config or fill one in."""
