#include <cstdio>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "epmoe/core/config.h"

int main(int argc, char** argv) {
  CLI::App app{"epmoe: Mixture-of-Experts layers under expert parallelism"};
  auto* presets = app.add_subcommand("presets", "list the built-in model presets");
  app.require_subcommand(1);
  CLI11_PARSE(app, argc, argv);
  if (presets->parsed()) {
    for (const auto& p : epmoe::presets()) fmt::print("{:18} {}\n", p.name, p.config.summary());
  }
  return 0;
}
