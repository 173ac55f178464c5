"""Example I/O, the ground floor every stage stands on: reading and validating rows (`loaders`),
turning them into prompts and tokens (`formatting`), the built-in verifiable tasks (`generate`)
and the one rule for what answer a text states (`answers`)."""
