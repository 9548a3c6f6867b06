"""AOC, the operation center: many clusters, one API and console, users and roles, audit."""
