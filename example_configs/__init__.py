"""axolotl YAML recipes for the chain adapters, shipped inside the package as `axolotl_chainlora.example_configs`
(`axolotl-chainlora demo` trains demo.yml)."""
