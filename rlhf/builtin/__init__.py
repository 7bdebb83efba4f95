"""The built-in demo task: support intents, its data set, the gold judge, the traffic simulator.

The library never branches on it: tasks/ choose it when `data.source` is "builtin" and
pass its judge and checks down as plain functions."""
