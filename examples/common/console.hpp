#pragma once
// What an example trainer prints: progress and reports go to stdout on rank 0 only.
#include <chrono>
#include <cstdarg>
#include <cstdio>

inline bool g_print = true;
inline void out(const char* fmt, ...) {
  if (!g_print) return;
  va_list args;
  va_start(args, fmt);
  std::vprintf(fmt, args);
  va_end(args);
}

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
