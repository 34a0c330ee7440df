// Shared helpers of the h2d engine tests: the fake driver's live counts, temp files, checks (C++).
#ifndef DS_TEST_H2D_HELPERS_H
#define DS_TEST_H2D_HELPERS_H

#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "dynsnap/digest.h"
#include "dynsnap/h2d.h"

#define T_PASS 0
#define T_FAIL 1
#define T_SKIP 77

#define CHECK(cond, ...) do { if (!(cond)) { std::fprintf(stderr, "%s:%d: check failed: %s: ", \
	__FILE__, __LINE__, #cond); std::fprintf(stderr, __VA_ARGS__); std::fputc('\n', stderr); return T_FAIL; } } while (0)

namespace t {

constexpr size_t MiB = size_t(1) << 20;
enum { HOST, DEV, STREAMS, EVENTS, REGISTERED };  // the fake's counters (fake_live)
using live_fn = long (*)(int);
inline live_fn g_live;  // set once by fake_driver(); the tests are single-threaded around it

// 0 when libcuda.so.1 is the fake (tests/fake_libcuda.c); T_SKIP otherwise (the test needs its counters).
inline int fake_driver()
{
	void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
	if (!h) {
		std::fprintf(stderr, "skip: no libcuda.so.1 (ctest puts the fake on LD_LIBRARY_PATH): %s\n", dlerror());
		return T_SKIP;
	}
	g_live = reinterpret_cast<live_fn>(dlsym(h, "fake_live"));
	if (!g_live) {
		std::fprintf(stderr, "skip: libcuda.so.1 is not the fake driver\n");
		return T_SKIP;
	}
	return 0;  // handle kept: the engine holds the same library for the process's life
}

inline long live(int which) { return g_live(which); }

inline std::vector<unsigned char> random_bytes(size_t n, unsigned seed)
{
	std::vector<unsigned char> v(n);
	for (size_t i = 0; i < n; i++) {
		seed = seed * 1103515245u + 12345u;
		v[i] = (unsigned char)(seed >> 16);
	}
	return v;
}

// A scratch directory in the working directory (the build tree), removed with its files at the end.
struct TempDir {
	std::string path;
	std::vector<std::string> files;
	TempDir()
	{
		char tmpl[] = "h2d-test-XXXXXX";
		if (!mkdtemp(tmpl)) {
			std::perror("mkdtemp");
			std::exit(T_FAIL);
		}
		path = tmpl;
	}
	~TempDir()
	{
		for (auto &f : files)
			if (unlink(f.c_str()) && errno != ENOENT)
				std::perror(f.c_str());
		if (rmdir(path.c_str()))
			std::perror(path.c_str());
	}
	std::string write(const std::string &name, const void *p, size_t n)
	{
		std::string f = path + "/" + name;
		int fd = open(f.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
		if (fd < 0) {
			std::perror(f.c_str());
			std::exit(T_FAIL);
		}
		files.push_back(f);
		size_t done = 0;
		while (done < n) {
			ssize_t w = ::write(fd, static_cast<const char *>(p) + done, n - done);
			if (w <= 0) {
				std::perror(f.c_str());
				std::exit(T_FAIL);
			}
			done += size_t(w);
		}
		if (close(fd)) {
			std::perror(f.c_str());
			std::exit(T_FAIL);
		}
		return f;
	}
};

}  // namespace t

#endif
