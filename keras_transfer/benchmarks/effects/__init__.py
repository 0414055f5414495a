"""Effects of the techniques (issue 18), one module each: `TARGETS` and `measure(seed, quick)`."""
