// The h2d engine refuses bad arguments before doing anything, and reports a digest mismatch, a truncated
// or missing shard and a refused registration as the first failure with its exact message, leaving no
// stream, event or registration behind and the device usable for the next load. Fake driver.
#include <sys/mman.h>

#include "h2d_helpers.h"

namespace h2d = ds::h2d;

namespace {

// Runs f and checks it throws E with exactly msg.
template <typename E, typename F>
int throws(F f, const std::string &msg, const char *what)
{
	try {
		f();
	} catch (E &e) {
		CHECK(msg == e.what(), "%s: message \"%s\", expected \"%s\"", what, e.what(), msg.c_str());
		return T_PASS;
	} catch (std::exception &e) {
		std::fprintf(stderr, "%s: wrong exception type: %s\n", what, e.what());
		return T_FAIL;
	}
	std::fprintf(stderr, "%s: nothing thrown\n", what);
	return T_FAIL;
}

int balanced(const char *what)
{
	CHECK(t::live(t::STREAMS) == 0 && t::live(t::EVENTS) == 0 && t::live(t::REGISTERED) == 0,
	      "%s: streams %ld events %ld registrations %ld still live", what, t::live(t::STREAMS),
	      t::live(t::EVENTS), t::live(t::REGISTERED));
	return T_PASS;
}

char hex[2][17];
const char *hx(int k, uint64_t v)
{
	std::snprintf(hex[k], sizeof(hex[k]), "%016llx", (unsigned long long)v);
	return hex[k];
}

int run()
{
	t::TempDir tmp;
	const size_t C = DS_DIGEST_CHUNK;
	std::vector<unsigned char> a = t::random_bytes(C + 4096 * 3 + 5, 9);
	std::string pa = tmp.write("a", a.data(), a.size());
	uint64_t good = ds_digest_region(a.data(), a.size());

	if (throws<std::out_of_range>([] { h2d::Device d(1); }, "no CUDA device 1 (the driver sees 1)", "ordinal"))
		return T_FAIL;
	h2d::Device dev(0);
	h2d::DevicePtr p = dev.alloc(a.size());
	h2d::LoadOptions opt;
	opt.chunk = C;
	opt.threads = 2;
	auto src1 = [&](uint64_t size, bool has_digest, uint64_t digest) {
		std::vector<h2d::Source> s(1);
		s[0].path = pa;
		s[0].size = size;
		s[0].has_digest = has_digest;
		s[0].digest = digest;
		return s;
	};
	std::vector<h2d::Job> all = {{0, 0, a.size(), p}};

	// argument errors: thrown before anything is read or copied
	struct Bad {
		const char *what;
		size_t chunk;
		std::vector<h2d::Job> jobs;
		const char *msg;
	} bad[] = {
		{"chunk 0", 0, all, "chunk must be a positive multiple of 8 MiB"},
		{"chunk 4 MiB", C / 2, all, "chunk must be a positive multiple of 8 MiB"},
		{"chunk 8 MiB + 4 KiB", C + 4096, all, "chunk must be a positive multiple of 8 MiB"},
		{"job past the end", C, {{0, 1, a.size(), p}}, "job outside its source (source 0)"},
		{"job offset wraps", C, {{0, ~0ull, 2, p}}, "job outside its source (source 0)"},
		{"no such source", C, {{1, 0, 1, p}}, "job outside its source (source 1)"},
		{"overlap", C, {{0, 100, 10, p}, {0, 0, 101, p}}, "jobs overlap inside one source"},
	};
	for (auto &b : bad) {
		h2d::LoadOptions o = opt;
		o.chunk = b.chunk;
		auto s = src1(a.size(), true, good);
		if (throws<std::invalid_argument>([&] { dev.load(s, b.jobs, o); }, b.msg, b.what))
			return T_FAIL;
	}
	CHECK(dev.pinned_bytes() == 0, "a refused load allocates nothing");
	std::vector<h2d::Source> host(1);
	host[0].addr = 4096 + 8;  // never dereferenced: refused first
	host[0].map_size = 8192;
	host[0].size = 100;
	if (throws<std::invalid_argument>([&] { dev.load(host, {}, opt); },
					  "host source 0 must be page-aligned and mapped for its whole size", "unaligned host"))
		return T_FAIL;
	host[0].addr = 4096;
	host[0].size = 8193;
	if (throws<std::invalid_argument>([&] { dev.load(host, {}, opt); },
					  "host source 0 must be page-aligned and mapped for its whole size", "short mapping"))
		return T_FAIL;

	// digest mismatch, on the buffered (hash-while-reading) and the O_DIRECT (hash-after) paths, and with copy=false
	for (int direct = 0; direct < 2; direct++)
		for (int copy = 0; copy < 2; copy++) {
			char what[64];
			std::snprintf(what, sizeof(what), "checksum, direct %d, copy %d", direct, copy);
			h2d::LoadOptions o = opt;
			o.direct = direct;
			o.copy = copy != 0;
			auto s = src1(a.size(), true, good ^ 1);
			h2d::LoadResult r = dev.load(s, copy ? all : std::vector<h2d::Job>{}, o);
			std::string msg = "checksum mismatch in shard " + pa + ": digest " + hx(0, good) +
					  ", the manifest says " + hx(1, good ^ 1);
			CHECK(!r.ok && r.kind == "checksum" && r.code == EIO && r.source == 0, "%s: %s %s", what,
			      r.kind.c_str(), r.error.c_str());
			CHECK(r.error == msg, "%s: \"%s\"", what, r.error.c_str());
			if (balanced(what))
				return T_FAIL;
		}
	// one changed byte in the last (short) chunk of the file is found
	std::vector<unsigned char> flipped = a;
	flipped.back() ^= 0x40;
	std::string pf = tmp.write("flipped", flipped.data(), flipped.size());
	{
		auto s = src1(a.size(), true, good);
		s[0].path = pf;
		h2d::LoadResult r = dev.load(s, all, opt);
		CHECK(!r.ok && r.kind == "checksum" && r.error.find("checksum mismatch in shard " + pf + ": ") == 0,
		      "flipped byte: %s", r.error.c_str());
	}
	// a host source's mismatch names it by index
	{
		size_t hmap = (a.size() + 4095) / 4096 * 4096;
		void *m = mmap(nullptr, hmap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		CHECK(m != MAP_FAILED, "mmap: %s", std::strerror(errno));
		std::memcpy(m, a.data(), a.size());
		std::vector<h2d::Source> hs(2);
		hs[0] = src1(a.size(), false, 0)[0];
		hs[1].addr = reinterpret_cast<uintptr_t>(m);
		hs[1].map_size = hmap;
		hs[1].size = a.size();
		hs[1].has_digest = true;
		hs[1].digest = good + 1;
		h2d::LoadResult r = dev.load(hs, {{1, 0, a.size(), p}}, opt);
		CHECK(!r.ok && r.kind == "checksum" && r.source == 1 &&
		      r.error == std::string("checksum mismatch in shard #1: digest ") + hx(0, good) +
				     ", the manifest says " + hx(1, good + 1), "host checksum: %s", r.error.c_str());
		if (balanced("host checksum"))
			return T_FAIL;
		// registration refused with host_mode=1 (register only): a cuda failure naming the call
		CHECK(setenv("FAKE_CUDA_NO_REGISTER", "1", 1) == 0, "setenv");
		h2d::LoadOptions o = opt;
		o.host_mode = 1;
		r = dev.load(hs, {{1, 0, a.size(), p}}, o);
		CHECK(unsetenv("FAKE_CUDA_NO_REGISTER") == 0, "unsetenv");
		CHECK(!r.ok && r.kind == "cuda" && r.code == 801 && r.source == 1 &&
		      r.error == "CUDA_ERROR_NOT_SUPPORTED in cuMemHostRegister: fake (CUresult 801)",
		      "register refused: %s %s", r.kind.c_str(), r.error.c_str());
		if (balanced("register refused"))
			return T_FAIL;
		CHECK(munmap(m, hmap) == 0, "munmap: %s", std::strerror(errno));
	}

	// truncated: the manifest says more bytes than the file has
	{
		auto s = src1(a.size() + 1, true, good);
		h2d::LoadResult r = dev.load(s, all, opt);
		std::string msg = "shard " + pa + " is truncated: " + std::to_string(a.size()) +
				  " bytes, the manifest says " + std::to_string(a.size() + 1);
		CHECK(!r.ok && r.kind == "truncated" && r.code == EIO && r.source == 0 && r.error == msg,
		      "truncated: %s %s", r.kind.c_str(), r.error.c_str());
		if (balanced("truncated"))
			return T_FAIL;
	}
	// a file that ends before the size it claims (sysfs: st_size 4096, a few bytes of content): the short read
	// is found on the plain read path (no digest) and on the read-and-hash path (digest)
	if (access("/sys/devices/system/cpu/online", R_OK) == 0) {
		const std::string sys = "/sys/devices/system/cpu/online";
		char buf[4096];
		int fd = open(sys.c_str(), O_RDONLY | O_CLOEXEC);
		CHECK(fd >= 0, "open %s: %s", sys.c_str(), std::strerror(errno));
		ssize_t len = read(fd, buf, sizeof(buf));
		CHECK(len > 0 && len < 4096, "read %s: %zd", sys.c_str(), len);
		CHECK(close(fd) == 0, "close");
		for (int digest = 0; digest < 2; digest++) {
			std::vector<h2d::Source> s(1);
			s[0].path = sys;
			s[0].size = 4096;
			s[0].has_digest = digest != 0;
			h2d::LoadResult r = dev.load(s, {{0, 0, 4096, p}}, opt);
			std::string msg = "shard " + sys + " is truncated: it ends at " + std::to_string(len) +
					  " bytes, the manifest says 4096";
			CHECK(!r.ok && r.kind == "truncated" && r.code == EIO && r.source == 0 && r.error == msg,
			      "short read, digest %d: %s %s", digest, r.kind.c_str(), r.error.c_str());
			if (balanced("short read"))
				return T_FAIL;
		}
	} else {
		std::printf("no /sys/devices/system/cpu/online: the short-read case is not run\n");
	}
	// missing: the open's errno and message
	{
		auto s = src1(a.size(), false, 0);
		s[0].path = tmp.path + "/missing";
		h2d::LoadResult r = dev.load(s, all, opt);
		CHECK(!r.ok && r.kind == "io" && r.code == ENOENT && r.source == 0 &&
		      r.error == "open " + s[0].path + ": " + std::strerror(ENOENT), "missing: %s", r.error.c_str());
	}
	// after every failure the device still loads correctly
	{
		auto s = src1(a.size(), true, good);
		h2d::LoadResult r = dev.load(s, all, opt);
		CHECK(r.ok, "good load after failures: %s", r.error.c_str());
		std::vector<unsigned char> got(a.size());
		dev.dtoh(got.data(), p, got.size());
		CHECK(got == a, "bytes after failures");
	}
	if (balanced("end"))
		return T_FAIL;
	dev.free(p);
	dev.close();
	CHECK(t::live(t::DEV) == 0 && t::live(t::HOST) == 0, "device %ld, pinned %ld left", t::live(t::DEV),
	      t::live(t::HOST));
	return T_PASS;
}

}  // namespace

int main()
{
	int rc = t::fake_driver();
	if (rc)
		return rc;
	try {
		return run();
	} catch (std::exception &e) {
		std::fprintf(stderr, "unexpected exception: %s\n", e.what());
		return T_FAIL;
	}
}
