// Stand-in for c10's TORCH_CHECK, for the host files the emulation compiles (device_plan.cpp).
#pragma once

#include <stdexcept>
#include <string>

#define TORCH_CHECK(cond, ...)                                             \
  do {                                                                     \
    if (!(cond)) throw std::runtime_error("TORCH_CHECK failed: " #cond);   \
  } while (0)
