/*
 * lavd-pkcs11-shim: a PKCS#11 module that forwards every call to another
 * module (SoftHSM in the tests) and, on demand, adds a delay per call to
 * emulate a network HSM, or injects faults.
 *
 * Tests and benchmarks only. `lavd serve` loads it like any vendor module
 * (`[hsm] module = ".../liblavd_pkcs11_shim.so"`); it reads its settings from
 * the file named by the environment variable LAVD_SHIM_CONFIG (set it in
 * lavd.toml's `[hsm.env]`; read once, when the module is loaded), and
 * re-reads that file when it changes, at most every 5 ms, so a test can
 * start and clear a fault while lavd runs:
 *
 *   module = /usr/lib/softhsm/libsofthsm2.so   # required; read once
 *   delay_us = 1000            # added before every forwarded call
 *   latency_us = 1000          # or: every forwarded call returns no sooner
 *                              # than this after it was made; the forwarded
 *                              # module's own work runs inside it, as a
 *                              # network HSM's work runs inside its round trip
 *   fault = none | device_removed | session_handle_invalid | device_error | hang
 *         | key_function_not_permitted | key_type_inconsistent | key_handle_invalid
 *         | action_prohibited
 *                              # key_function_not_permitted, key_type_inconsistent:
 *                              # what a token answers a key its policy or type
 *                              # keeps from the operation; key_handle_invalid:
 *                              # a key handle that names nothing any more
 *                              # (the token's objects renumbered);
 *                              # action_prohibited: what a token's policy
 *                              # answers an object it will not destroy
 *   fault_calls = C_DeriveKey,C_Sign   # default: every call but the four below;
 *                              # each name one the module forwards
 *   fault_after = 0            # matching calls let through first (since the last change)
 *   fault_probability = 1.0    # chance, from 0 to 1, that a matching call after that fails
 *   fault_limit = 0            # most faults of `fault` to inject since the last
 *                              # change (0: no limit); PIN refusals do not count
 *   stats = /path/to/file      # where "calls N", "faults N" (every fault and PIN
 *                              # refusal since the module was loaded) and
 *                              # "refused N" (settings files refused) are written
 *                              # after each fault and each refusal
 *   derive_log = /path/to/file # each C_DeriveKey with CKM_ECDH1_DERIVE appends
 *                              # its peer point, in hex, as a line, before it is
 *                              # forwarded (one write(2) in O_APPEND mode, so a
 *                              # process killed right after leaves it whole):
 *                              # every open lavd asked the HSM for
 *   keypair_private = CKA_PRIVATE:false, CKA_SIGN_RECOVER:true
 *                              # C_GenerateKeyPair's private-key template gets
 *                              # these values in place of the caller's, as a
 *                              # token that ignores part of a template makes
 *                              # the key: each of CKA_TOKEN, CKA_PRIVATE,
 *                              # CKA_SIGN_RECOVER at most once, true or false
 *   keypair_public = CKA_TOKEN:false
 *                              # the same for the public-key template
 *   pin = NEW:REAL             # the user PIN was changed on the token to NEW:
 *                              # C_Login as user with NEW is forwarded with REAL
 *                              # (the forwarded token's PIN); with anything else it
 *                              # returns CKR_PIN_INCORRECT, counted as a fault.
 *                              # The PIN is checked on every C_Login, logged in or
 *                              # not, as some tokens do. Independent of `fault`.
 *
 * `#` starts a comment anywhere on a line, so no value can hold one (a
 * `pin` with `#` in it cannot be given). A settings file removed while the
 * module runs leaves the last settings in force (only `hang` notices).
 *
 * A "change" is any new version of the file (a new inode, size or
 * modification time): it restarts `fault_after`'s and `fault_limit`'s
 * counts, even if it says what the last one said.
 *
 * `hang` blocks the call until the file no longer holds it (it no longer
 * says `hang`, or its `fault_calls` no longer name the call's function),
 * then handles it under the new settings; or, if the file is removed or
 * 120 s pass first, fails it with CKR_DEVICE_ERROR (a test that failed
 * before releasing it must not wait for ever). C_GetFunctionList, C_Initialize, C_Finalize and C_GetInfo are never
 * delayed or faulted: they are library calls, not device round trips.
 *
 * A settings file the module cannot take as written is refused, loudly: a
 * line without '=', an unknown key or fault, a count or a time that is not
 * a whole number from 0 (`delay_us = 1ms`, `fault_after = -1`), a
 * probability that is not a number from 0 to 1 (`fault_probability =
 * 50%`), a name in `fault_calls` that is not a function the module forwards
 * (a misspelling would never match), `pin` without ':'. The module then
 * writes the file, line and reason to stderr, keeps its previous settings,
 * counts the refusal in the stats file ("refused N", the previous stats
 * path), and fails every forwarded call with CKR_GENERAL_ERROR until a file
 * it accepts replaces it: a test that misspelled its fault sees every HSM
 * call fail, never a fault silently not injected. A refused file at load
 * fails C_GetFunctionList (CKR_GENERAL_ERROR).
 *
 * The function signatures are PKCS#11 v2.40's (OASIS), as declared in
 * p11-kit's <p11-kit/pkcs11.h>.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* The lower-case (GNU) names of p11-kit's header. */
#define CRYPTOKI_GNU 1
#include <p11-kit/pkcs11.h>

enum fault { FAULT_NONE, FAULT_RV, FAULT_HANG };

/* Most `keypair_private` or `keypair_public` values: one per attribute
 * they may name. */
#define MAX_OVERRIDES 3

struct flag_override {
	ck_attribute_type_t type;
	unsigned char value;
};

/* The longest a `hang` holds a call (see `before`). The longest hold a
 * test means is about 15 s. */
#define HANG_MAX_S 120

struct settings {
	char module[4096];
	long delay_us;
	long latency_us;
	enum fault fault;
	ck_rv_t fault_rv;
	char fault_calls[4096]; /* ",C_A,C_B," or empty for every call */
	unsigned long fault_after;
	double fault_probability;
	unsigned long fault_limit;
	char stats[4096];
	char derive_log[4096]; /* empty: none */
	struct flag_override keypair_private[MAX_OVERRIDES];
	int keypair_private_n;
	struct flag_override keypair_public[MAX_OVERRIDES];
	int keypair_public_n;
	char pin_new[256];  /* empty: no PIN change */
	char pin_real[256];
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct settings cfg;          /* guarded by `lock` */
static struct timespec cfg_mtime;    /* guarded by `lock` */
static off_t cfg_size = -1;          /* guarded by `lock` */
static ino_t cfg_ino;                /* guarded by `lock` */
static char cfg_path[4096];          /* LAVD_SHIM_CONFIG, read at load; guarded by `lock` */
static unsigned long matching_calls; /* guarded by `lock`; reset on change */
static unsigned long injected;       /* faults of `fault` since the last change;
				      * guarded by `lock`; reset on change */
static unsigned long faults;         /* every fault and PIN refusal since the load;
				      * guarded by `lock` */
static int refused;                  /* the file now there was refused; guarded by `lock` */
static unsigned long refusals;       /* guarded by `lock` */
static atomic_ulong calls;
static atomic_long next_check_ns;
static struct ck_function_list *real;
static struct ck_function_list shim;
static unsigned int rng_state = 1;   /* guarded by `lock` */

static long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
	return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void trim(char *s)
{
	char *end = s + strlen(s);
	while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\n' || end[-1] == '\r'))
		*--end = 0;
	char *start = s;
	while (*start == ' ' || *start == '\t')
		start++;
	memmove(s, start, strlen(start) + 1);
}

/* Every function the module forwards (through `before`), by name: the
 * names `fault_calls` may hold, and the entries `load` fills in. */
#define FORWARDED(X)                                                       \
	X(C_GetSlotList) X(C_GetSlotInfo) X(C_GetTokenInfo)                \
	X(C_GetMechanismList) X(C_GetMechanismInfo) X(C_InitToken)         \
	X(C_InitPIN) X(C_SetPIN) X(C_OpenSession) X(C_CloseSession)        \
	X(C_CloseAllSessions) X(C_GetSessionInfo) X(C_GetOperationState)   \
	X(C_SetOperationState) X(C_Login) X(C_Logout) X(C_CreateObject)    \
	X(C_CopyObject) X(C_DestroyObject) X(C_GetObjectSize)              \
	X(C_GetAttributeValue) X(C_SetAttributeValue) X(C_FindObjectsInit) \
	X(C_FindObjects) X(C_FindObjectsFinal) X(C_EncryptInit)            \
	X(C_Encrypt) X(C_EncryptUpdate) X(C_EncryptFinal) X(C_DecryptInit) \
	X(C_Decrypt) X(C_DecryptUpdate) X(C_DecryptFinal) X(C_DigestInit)  \
	X(C_Digest) X(C_DigestUpdate) X(C_DigestKey) X(C_DigestFinal)      \
	X(C_SignInit) X(C_Sign) X(C_SignUpdate) X(C_SignFinal)             \
	X(C_SignRecoverInit) X(C_SignRecover) X(C_VerifyInit) X(C_Verify)  \
	X(C_VerifyUpdate) X(C_VerifyFinal) X(C_VerifyRecoverInit)          \
	X(C_VerifyRecover) X(C_DigestEncryptUpdate)                        \
	X(C_DecryptDigestUpdate) X(C_SignEncryptUpdate)                    \
	X(C_DecryptVerifyUpdate) X(C_GenerateKey) X(C_GenerateKeyPair)     \
	X(C_WrapKey) X(C_UnwrapKey) X(C_DeriveKey) X(C_SeedRandom)         \
	X(C_GenerateRandom) X(C_GetFunctionStatus) X(C_CancelFunction)     \
	X(C_WaitForSlotEvent)

#define NAME(name) #name,
static const char *const forwarded[] = { FORWARDED(NAME) };
#undef NAME

static int is_forwarded(const char *name)
{
	for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++)
		if (!strcmp(forwarded[i], name))
			return 1;
	return 0;
}

/* `value` as a whole number from 0 to `max`, in decimal digits only (no
 * sign, no unit, no space). Returns 0 on success. */
static int whole(const char *value, unsigned long max, unsigned long *out)
{
	if (!*value)
		return -1;
	for (const char *c = value; *c; c++)
		if (!isdigit((unsigned char)*c))
			return -1;
	errno = 0;
	unsigned long v = strtoul(value, NULL, 10);
	if (errno || v > max)
		return -1;
	*out = v;
	return 0;
}

/* Parses the open settings file `f` into `out` (the caller closes it).
 * Returns 0, or -2 if it is refused, with the reason in `why` (see the
 * header comment). */
static int parse(FILE *f, struct settings *out, char *why, size_t why_len)
{
	memset(out, 0, sizeof(*out));
	out->fault_probability = 1.0;
	char line[8192];
	int n = 0;
#define REFUSE(...)                                                   \
	do {                                                          \
		int at = snprintf(why, why_len, "line %d: ", n);      \
		snprintf(why + at, why_len - at, __VA_ARGS__);        \
		return -2;                                            \
	} while (0)
	while (fgets(line, sizeof line, f)) {
		n++;
		char *hash = strchr(line, '#');
		if (hash)
			*hash = 0;
		trim(line);
		if (!*line)
			continue;
		char *eq = strchr(line, '=');
		if (!eq)
			REFUSE("no '=' in `%.200s`", line);
		*eq = 0;
		char *key = line, *value = eq + 1;
		trim(key);
		trim(value);
		unsigned long number;
		if (!strcmp(key, "module")) {
			snprintf(out->module, sizeof out->module, "%s", value);
		} else if (!strcmp(key, "delay_us") || !strcmp(key, "latency_us")) {
			if (whole(value, LONG_MAX / 1000, &number))
				REFUSE("%.200s = `%.200s`: not a whole number of microseconds", key, value);
			if (key[0] == 'd')
				out->delay_us = (long)number;
			else
				out->latency_us = (long)number;
		} else if (!strcmp(key, "fault")) {
			if (!strcmp(value, "none")) {
				out->fault = FAULT_NONE;
			} else if (!strcmp(value, "hang")) {
				out->fault = FAULT_HANG;
			} else if (!strcmp(value, "device_removed")) {
				out->fault = FAULT_RV;
				out->fault_rv = CKR_DEVICE_REMOVED;
			} else if (!strcmp(value, "session_handle_invalid")) {
				out->fault = FAULT_RV;
				out->fault_rv = CKR_SESSION_HANDLE_INVALID;
			} else if (!strcmp(value, "device_error")) {
				out->fault = FAULT_RV;
				out->fault_rv = CKR_DEVICE_ERROR;
			} else if (!strcmp(value, "key_function_not_permitted")) {
				out->fault = FAULT_RV;
				out->fault_rv = CKR_KEY_FUNCTION_NOT_PERMITTED;
			} else if (!strcmp(value, "key_type_inconsistent")) {
				out->fault = FAULT_RV;
				out->fault_rv = CKR_KEY_TYPE_INCONSISTENT;
			} else if (!strcmp(value, "key_handle_invalid")) {
				out->fault = FAULT_RV;
				out->fault_rv = CKR_KEY_HANDLE_INVALID;
			} else if (!strcmp(value, "action_prohibited")) {
				out->fault = FAULT_RV;
				out->fault_rv = CKR_ACTION_PROHIBITED;
			} else {
				REFUSE("unknown fault `%.200s`", value);
			}
		} else if (!strcmp(key, "fault_calls")) {
			/* ",C_A,C_B,": names separated by commas or spaces. */
			char list[sizeof out->fault_calls];
			snprintf(list, sizeof list, "%s", value);
			size_t used = 0;
			out->fault_calls[used++] = ',';
			int names = 0;
			char *rest = NULL;
			for (char *name = strtok_r(list, ", \t", &rest); name;
			     name = strtok_r(NULL, ", \t", &rest)) {
				if (!is_forwarded(name))
					REFUSE("fault_calls: `%.200s` is not a function this module forwards", name);
				size_t len = strlen(name);
				if (used + len + 2 > sizeof out->fault_calls)
					REFUSE("fault_calls: too long");
				memcpy(out->fault_calls + used, name, len);
				used += len;
				out->fault_calls[used++] = ',';
				names++;
			}
			out->fault_calls[used] = 0;
			if (!names)
				REFUSE("fault_calls: no function named (leave the key out for every call)");
		} else if (!strcmp(key, "fault_after")) {
			if (whole(value, ULONG_MAX, &out->fault_after))
				REFUSE("fault_after = `%.200s`: not a whole number", value);
		} else if (!strcmp(key, "fault_probability")) {
			char *end = NULL;
			errno = 0;
			double p = strtod(value, &end);
			/* The negated test refuses NaN too. */
			if (!*value || errno || !end || *end || !(p >= 0.0 && p <= 1.0))
				REFUSE("fault_probability = `%.200s`: not a number from 0 to 1", value);
			out->fault_probability = p;
		} else if (!strcmp(key, "fault_limit")) {
			if (whole(value, ULONG_MAX, &out->fault_limit))
				REFUSE("fault_limit = `%.200s`: not a whole number", value);
		} else if (!strcmp(key, "keypair_private") || !strcmp(key, "keypair_public")) {
			int private_half = !strcmp(key, "keypair_private");
			struct flag_override *into = private_half ? out->keypair_private : out->keypair_public;
			int *count = private_half ? &out->keypair_private_n : &out->keypair_public_n;
			if (*count)
				REFUSE("%.20s: given twice", key);
			char list[8192];
			snprintf(list, sizeof list, "%s", value);
			char *rest = NULL;
			for (char *item = strtok_r(list, ", \t", &rest); item;
			     item = strtok_r(NULL, ", \t", &rest)) {
				char *colon = strchr(item, ':');
				if (!colon)
					REFUSE("%.20s: `%.200s` is not NAME:true or NAME:false", key, item);
				*colon = 0;
				const char *flag = colon + 1;
				struct flag_override o;
				if (!strcmp(item, "CKA_TOKEN"))
					o.type = CKA_TOKEN;
				else if (!strcmp(item, "CKA_PRIVATE"))
					o.type = CKA_PRIVATE;
				else if (!strcmp(item, "CKA_SIGN_RECOVER"))
					o.type = CKA_SIGN_RECOVER;
				else
					REFUSE("%.20s: `%.200s` is not CKA_TOKEN, CKA_PRIVATE or CKA_SIGN_RECOVER", key, item);
				if (!strcmp(flag, "true"))
					o.value = 1;
				else if (!strcmp(flag, "false"))
					o.value = 0;
				else
					REFUSE("%.20s: %.200s:`%.200s` is not true or false", key, item, flag);
				for (int j = 0; j < *count; j++)
					if (into[j].type == o.type)
						REFUSE("%.20s: %.200s named twice", key, item);
				into[(*count)++] = o;
			}
			if (!*count)
				REFUSE("%.20s: no value (leave the key out for none)", key);
		} else if (!strcmp(key, "pin")) {
			char *colon = strchr(value, ':');
			if (!colon)
				REFUSE("pin is NEW:REAL");
			*colon = 0;
			snprintf(out->pin_new, sizeof out->pin_new, "%s", value);
			snprintf(out->pin_real, sizeof out->pin_real, "%s", colon + 1);
		} else if (!strcmp(key, "stats")) {
			snprintf(out->stats, sizeof out->stats, "%s", value);
		} else if (!strcmp(key, "derive_log")) {
			snprintf(out->derive_log, sizeof out->derive_log, "%s", value);
		} else {
			REFUSE("unknown key `%.200s`", key);
		}
	}
#undef REFUSE
	return 0;
}

static void write_stats_locked(void)
{
	if (!cfg.stats[0])
		return;
	char tmp[4200];
	/* Per process: two processes on one settings file must not write
	 * each other's half-written stats. */
	snprintf(tmp, sizeof tmp, "%s.%ld.tmp", cfg.stats, (long)getpid());
	FILE *f = fopen(tmp, "w");
	if (!f)
		return;
	fprintf(f, "calls %lu\nfaults %lu\nrefused %lu\n", atomic_load(&calls), faults, refusals);
	fclose(f);
	rename(tmp, cfg.stats);
}

/* Re-reads the settings file if it changed. Called with `lock` held. */
static void reload_locked(int force)
{
	/* The file is opened once and its identity read from what was opened:
	 * a settings file renamed into place between a stat of the path and
	 * the read would otherwise be recorded as the old one and applied
	 * again at the next check, resetting the counts of the new one. */
	struct stat st;
	if (!cfg_path[0])
		return;
	FILE *f = fopen(cfg_path, "r");
	if (!f)
		return;
	if (fstat(fileno(f), &st) != 0 ||
	    (!force && st.st_size == cfg_size && st.st_ino == cfg_ino &&
	     st.st_mtim.tv_sec == cfg_mtime.tv_sec && st.st_mtim.tv_nsec == cfg_mtime.tv_nsec)) {
		fclose(f);
		return;
	}
	struct settings next;
	char why[512];
	int parsed = parse(f, &next, why, sizeof why);
	fclose(f);
	cfg_size = st.st_size;
	cfg_ino = st.st_ino;
	cfg_mtime = st.st_mtim;
	if (parsed == -2) {
		/* Refused: the previous settings stay, and every call fails. */
		fprintf(stderr, "lavd-pkcs11-shim: %s refused, every call fails until it is fixed: %s\n",
			cfg_path, why);
		refused = 1;
		refusals++;
		write_stats_locked();
		return;
	}
	/* The module to forward to is fixed once loaded. */
	if (cfg.module[0])
		memcpy(next.module, cfg.module, sizeof next.module);
	cfg = next;
	refused = 0;
	matching_calls = 0;
	injected = 0;
}

static void maybe_reload(void)
{
	long now = now_ns();
	if (now < atomic_load(&next_check_ns))
		return;
	atomic_store(&next_check_ns, now + 5000000L);
	pthread_mutex_lock(&lock);
	reload_locked(0);
	pthread_mutex_unlock(&lock);
}

/* Sleeps until the absolute CLOCK_MONOTONIC time `until`, with no timer
 * slack: Linux's default 50 us slack lets a 1 ms sleep run late, and a
 * network round trip has no such slack. The wake-up time is absolute, so a
 * signal cannot stretch the sleep either. */
static void sleep_until(const struct timespec *until)
{
	static __thread int slack_set;
	if (!slack_set) {
		prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
		slack_set = 1;
	}
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, until, NULL) == EINTR)
		;
}

/* Now plus `us` microseconds, on CLOCK_MONOTONIC. */
static struct timespec after_us(long us)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	t.tv_sec += us / 1000000L;
	t.tv_nsec += (us % 1000000L) * 1000L;
	if (t.tv_nsec >= 1000000000L) {
		t.tv_sec += 1;
		t.tv_nsec -= 1000000000L;
	}
	return t;
}

/* What to do with one call of `name`: CKR_OK to forward it, or the fault.
 * Sets `*until` to when a forwarded call may return under `latency_us`, or
 * to zero. */
static ck_rv_t before(const char *name, struct timespec *until)
{
	until->tv_sec = 0;
	until->tv_nsec = 0;
	atomic_fetch_add(&calls, 1);
	maybe_reload();
	for (;;) {
		pthread_mutex_lock(&lock);
		if (refused) {
			pthread_mutex_unlock(&lock);
			return CKR_GENERAL_ERROR;
		}
		long delay = cfg.delay_us;
		long latency = cfg.latency_us;
		enum fault fault = cfg.fault;
		ck_rv_t rv = CKR_OK;
		int hang = 0;
		if (fault != FAULT_NONE) {
			int matches = 1;
			if (cfg.fault_calls[0]) {
				char needle[128];
				snprintf(needle, sizeof needle, ",%s,", name);
				matches = strstr(cfg.fault_calls, needle) != NULL;
			}
			if (matches) {
				matching_calls++;
				int limited = cfg.fault_limit && injected >= cfg.fault_limit;
				int roll = cfg.fault_probability >= 1.0 ||
					   (double)rand_r(&rng_state) / RAND_MAX < cfg.fault_probability;
				if (matching_calls > cfg.fault_after && !limited && roll) {
					if (fault == FAULT_HANG) {
						hang = 1;
					} else {
						rv = cfg.fault_rv;
					}
					injected++;
					faults++;
					write_stats_locked();
				}
			}
		}
		pthread_mutex_unlock(&lock);
		if (hang) {
			/* Hold the call until the file stops holding it: it no
			 * longer says `hang`, or its `fault_calls` no longer name
			 * this function. Or until the file is gone (the test's
			 * directory removed: nothing can release it any more), or
			 * HANG_MAX_S have passed (a test that failed before it
			 * released the call): then the call fails, so that no
			 * test waits for ever on a call held for a test that
			 * ended. */
			char needle[128];
			snprintf(needle, sizeof needle, ",%s,", name);
			struct timespec began;
			clock_gettime(CLOCK_MONOTONIC, &began);
			int abandoned = 0;
			for (;;) {
				struct timespec ts = { 0, 5000000L };
				nanosleep(&ts, NULL);
				struct timespec now;
				clock_gettime(CLOCK_MONOTONIC, &now);
				struct stat there;
				pthread_mutex_lock(&lock);
				if (now.tv_sec - began.tv_sec >= HANG_MAX_S || stat(cfg_path, &there) != 0) {
					pthread_mutex_unlock(&lock);
					abandoned = 1;
					break;
				}
				reload_locked(0);
				/* A refused file ends the hang too: the call then fails. */
				int still = cfg.fault == FAULT_HANG && !refused &&
					    (!cfg.fault_calls[0] || strstr(cfg.fault_calls, needle));
				pthread_mutex_unlock(&lock);
				if (!still)
					break;
			}
			if (abandoned)
				return CKR_DEVICE_ERROR;
			continue;
		}
		if (delay > 0) {
			struct timespec wake = after_us(delay);
			sleep_until(&wake);
		}
		if (latency > 0 && rv == CKR_OK)
			*until = after_us(latency);
		return rv;
	}
}

#define FWD(name, params, args)                        \
	static ck_rv_t shim_##name params              \
	{                                              \
		struct timespec until;                 \
		ck_rv_t rv = before(#name, &until);    \
		if (rv != CKR_OK)                      \
			return rv;                     \
		rv = real->name args;                  \
		if (until.tv_sec || until.tv_nsec)     \
			sleep_until(&until);           \
		return rv;                             \
	}

FWD(C_GetSlotList, (unsigned char token_present, ck_slot_id_t *slot_list, unsigned long *count), (token_present, slot_list, count))
FWD(C_GetSlotInfo, (ck_slot_id_t slot_id, struct ck_slot_info *info), (slot_id, info))
FWD(C_GetTokenInfo, (ck_slot_id_t slot_id, struct ck_token_info *info), (slot_id, info))
FWD(C_GetMechanismList, (ck_slot_id_t slot_id, ck_mechanism_type_t *mechanism_list, unsigned long *count), (slot_id, mechanism_list, count))
FWD(C_GetMechanismInfo, (ck_slot_id_t slot_id, ck_mechanism_type_t type, struct ck_mechanism_info *info), (slot_id, type, info))
FWD(C_InitToken, (ck_slot_id_t slot_id, unsigned char *pin, unsigned long pin_len, unsigned char *label), (slot_id, pin, pin_len, label))
FWD(C_InitPIN, (ck_session_handle_t session, unsigned char *pin, unsigned long pin_len), (session, pin, pin_len))
FWD(C_SetPIN, (ck_session_handle_t session, unsigned char *old_pin, unsigned long old_len, unsigned char *new_pin, unsigned long new_len), (session, old_pin, old_len, new_pin, new_len))
FWD(C_OpenSession, (ck_slot_id_t slot_id, ck_flags_t flags, void *application, ck_notify_t notify, ck_session_handle_t *session), (slot_id, flags, application, notify, session))
FWD(C_CloseSession, (ck_session_handle_t session), (session))
FWD(C_CloseAllSessions, (ck_slot_id_t slot_id), (slot_id))
FWD(C_GetSessionInfo, (ck_session_handle_t session, struct ck_session_info *info), (session, info))
FWD(C_GetOperationState, (ck_session_handle_t session, unsigned char *operation_state, unsigned long *operation_state_len), (session, operation_state, operation_state_len))
FWD(C_SetOperationState, (ck_session_handle_t session, unsigned char *operation_state, unsigned long operation_state_len, ck_object_handle_t encryption_key, ck_object_handle_t authentiation_key), (session, operation_state, operation_state_len, encryption_key, authentiation_key))
/* C_Login, with the PIN change of `pin = NEW:REAL` applied. */
static ck_rv_t shim_C_Login(ck_session_handle_t session, ck_user_type_t user_type,
			    unsigned char *pin, unsigned long pin_len)
{
	struct timespec until;
	ck_rv_t rv = before("C_Login", &until);
	if (rv != CKR_OK)
		return rv;
	char real_pin[256];
	int changed = 0;
	pthread_mutex_lock(&lock);
	if (cfg.pin_new[0] && user_type == CKU_USER) {
		changed = 1;
		size_t n = strlen(cfg.pin_new);
		if (!pin || pin_len != n || memcmp(pin, cfg.pin_new, n) != 0) {
			faults++;
			write_stats_locked();
			pthread_mutex_unlock(&lock);
			return CKR_PIN_INCORRECT;
		}
		snprintf(real_pin, sizeof real_pin, "%s", cfg.pin_real);
	}
	pthread_mutex_unlock(&lock);
	if (changed) {
		pin = (unsigned char *)real_pin;
		pin_len = strlen(real_pin);
	}
	rv = real->C_Login(session, user_type, pin, pin_len);
	if (until.tv_sec || until.tv_nsec)
		sleep_until(&until);
	return rv;
}
FWD(C_Logout, (ck_session_handle_t session), (session))
FWD(C_CreateObject, (ck_session_handle_t session, struct ck_attribute *templ, unsigned long count, ck_object_handle_t *object), (session, templ, count, object))
FWD(C_CopyObject, (ck_session_handle_t session, ck_object_handle_t object, struct ck_attribute *templ, unsigned long count, ck_object_handle_t *new_object), (session, object, templ, count, new_object))
FWD(C_DestroyObject, (ck_session_handle_t session, ck_object_handle_t object), (session, object))
FWD(C_GetObjectSize, (ck_session_handle_t session, ck_object_handle_t object, unsigned long *size), (session, object, size))
FWD(C_GetAttributeValue, (ck_session_handle_t session, ck_object_handle_t object, struct ck_attribute *templ, unsigned long count), (session, object, templ, count))
FWD(C_SetAttributeValue, (ck_session_handle_t session, ck_object_handle_t object, struct ck_attribute *templ, unsigned long count), (session, object, templ, count))
FWD(C_FindObjectsInit, (ck_session_handle_t session, struct ck_attribute *templ, unsigned long count), (session, templ, count))
FWD(C_FindObjects, (ck_session_handle_t session, ck_object_handle_t *object, unsigned long max_object_count, unsigned long *object_count), (session, object, max_object_count, object_count))
FWD(C_FindObjectsFinal, (ck_session_handle_t session), (session))
FWD(C_EncryptInit, (ck_session_handle_t session, struct ck_mechanism *mechanism, ck_object_handle_t key), (session, mechanism, key))
FWD(C_Encrypt, (ck_session_handle_t session, unsigned char *data, unsigned long data_len, unsigned char *encrypted_data, unsigned long *encrypted_data_len), (session, data, data_len, encrypted_data, encrypted_data_len))
FWD(C_EncryptUpdate, (ck_session_handle_t session, unsigned char *part, unsigned long part_len, unsigned char *encrypted_part, unsigned long *encrypted_part_len), (session, part, part_len, encrypted_part, encrypted_part_len))
FWD(C_EncryptFinal, (ck_session_handle_t session, unsigned char *last_encrypted_part, unsigned long *last_encrypted_part_len), (session, last_encrypted_part, last_encrypted_part_len))
FWD(C_DecryptInit, (ck_session_handle_t session, struct ck_mechanism *mechanism, ck_object_handle_t key), (session, mechanism, key))
FWD(C_Decrypt, (ck_session_handle_t session, unsigned char *encrypted_data, unsigned long encrypted_data_len, unsigned char *data, unsigned long *data_len), (session, encrypted_data, encrypted_data_len, data, data_len))
FWD(C_DecryptUpdate, (ck_session_handle_t session, unsigned char *encrypted_part, unsigned long encrypted_part_len, unsigned char *part, unsigned long *part_len), (session, encrypted_part, encrypted_part_len, part, part_len))
FWD(C_DecryptFinal, (ck_session_handle_t session, unsigned char *last_part, unsigned long *last_part_len), (session, last_part, last_part_len))
FWD(C_DigestInit, (ck_session_handle_t session, struct ck_mechanism *mechanism), (session, mechanism))
FWD(C_Digest, (ck_session_handle_t session, unsigned char *data, unsigned long data_len, unsigned char *digest, unsigned long *digest_len), (session, data, data_len, digest, digest_len))
FWD(C_DigestUpdate, (ck_session_handle_t session, unsigned char *part, unsigned long part_len), (session, part, part_len))
FWD(C_DigestKey, (ck_session_handle_t session, ck_object_handle_t key), (session, key))
FWD(C_DigestFinal, (ck_session_handle_t session, unsigned char *digest, unsigned long *digest_len), (session, digest, digest_len))
FWD(C_SignInit, (ck_session_handle_t session, struct ck_mechanism *mechanism, ck_object_handle_t key), (session, mechanism, key))
FWD(C_Sign, (ck_session_handle_t session, unsigned char *data, unsigned long data_len, unsigned char *signature, unsigned long *signature_len), (session, data, data_len, signature, signature_len))
FWD(C_SignUpdate, (ck_session_handle_t session, unsigned char *part, unsigned long part_len), (session, part, part_len))
FWD(C_SignFinal, (ck_session_handle_t session, unsigned char *signature, unsigned long *signature_len), (session, signature, signature_len))
FWD(C_SignRecoverInit, (ck_session_handle_t session, struct ck_mechanism *mechanism, ck_object_handle_t key), (session, mechanism, key))
FWD(C_SignRecover, (ck_session_handle_t session, unsigned char *data, unsigned long data_len, unsigned char *signature, unsigned long *signature_len), (session, data, data_len, signature, signature_len))
FWD(C_VerifyInit, (ck_session_handle_t session, struct ck_mechanism *mechanism, ck_object_handle_t key), (session, mechanism, key))
FWD(C_Verify, (ck_session_handle_t session, unsigned char *data, unsigned long data_len, unsigned char *signature, unsigned long signature_len), (session, data, data_len, signature, signature_len))
FWD(C_VerifyUpdate, (ck_session_handle_t session, unsigned char *part, unsigned long part_len), (session, part, part_len))
FWD(C_VerifyFinal, (ck_session_handle_t session, unsigned char *signature, unsigned long signature_len), (session, signature, signature_len))
FWD(C_VerifyRecoverInit, (ck_session_handle_t session, struct ck_mechanism *mechanism, ck_object_handle_t key), (session, mechanism, key))
FWD(C_VerifyRecover, (ck_session_handle_t session, unsigned char *signature, unsigned long signature_len, unsigned char *data, unsigned long *data_len), (session, signature, signature_len, data, data_len))
FWD(C_DigestEncryptUpdate, (ck_session_handle_t session, unsigned char *part, unsigned long part_len, unsigned char *encrypted_part, unsigned long *encrypted_part_len), (session, part, part_len, encrypted_part, encrypted_part_len))
FWD(C_DecryptDigestUpdate, (ck_session_handle_t session, unsigned char *encrypted_part, unsigned long encrypted_part_len, unsigned char *part, unsigned long *part_len), (session, encrypted_part, encrypted_part_len, part, part_len))
FWD(C_SignEncryptUpdate, (ck_session_handle_t session, unsigned char *part, unsigned long part_len, unsigned char *encrypted_part, unsigned long *encrypted_part_len), (session, part, part_len, encrypted_part, encrypted_part_len))
FWD(C_DecryptVerifyUpdate, (ck_session_handle_t session, unsigned char *encrypted_part, unsigned long encrypted_part_len, unsigned char *part, unsigned long *part_len), (session, encrypted_part, encrypted_part_len, part, part_len))
FWD(C_GenerateKey, (ck_session_handle_t session, struct ck_mechanism *mechanism, struct ck_attribute *templ, unsigned long count, ck_object_handle_t *key), (session, mechanism, templ, count, key))
/* The most attributes a template `edit_template` edits may hold. */
#define MAX_TEMPLATE 64

/* `*templ` (of `*count` attributes) with `over`'s `n` values in place of
 * its own, in `edited` (room for MAX_TEMPLATE + MAX_OVERRIDES); `over`
 * must outlive the call the edited template is given to. Returns 0, or -1
 * for a template it cannot edit (which then fails, never passes
 * unedited). */
static int edit_template(struct ck_attribute **templ, unsigned long *count,
			 struct flag_override *over, int n, struct ck_attribute *edited)
{
	if (!n)
		return 0;
	if (*count > MAX_TEMPLATE || (*count && !*templ))
		return -1;
	unsigned long kept = 0;
	for (unsigned long i = 0; i < *count; i++) {
		int replaced = 0;
		for (int j = 0; j < n; j++)
			if ((*templ)[i].type == over[j].type)
				replaced = 1;
		if (!replaced)
			edited[kept++] = (*templ)[i];
	}
	for (int j = 0; j < n; j++) {
		edited[kept].type = over[j].type;
		edited[kept].value = &over[j].value;
		edited[kept].value_len = 1;
		kept++;
	}
	*templ = edited;
	*count = kept;
	return 0;
}

/* C_GenerateKeyPair, with `keypair_public`'s and `keypair_private`'s
 * values in the two templates in place of the caller's. */
static ck_rv_t shim_C_GenerateKeyPair(ck_session_handle_t session, struct ck_mechanism *mechanism,
				      struct ck_attribute *public_key_template,
				      unsigned long public_key_attribute_count,
				      struct ck_attribute *private_key_template,
				      unsigned long private_key_attribute_count,
				      ck_object_handle_t *public_key, ck_object_handle_t *private_key)
{
	struct timespec until;
	ck_rv_t rv = before("C_GenerateKeyPair", &until);
	if (rv != CKR_OK)
		return rv;
	struct flag_override over_private[MAX_OVERRIDES], over_public[MAX_OVERRIDES];
	pthread_mutex_lock(&lock);
	int n_private = cfg.keypair_private_n, n_public = cfg.keypair_public_n;
	memcpy(over_private, cfg.keypair_private, sizeof over_private);
	memcpy(over_public, cfg.keypair_public, sizeof over_public);
	pthread_mutex_unlock(&lock);
	struct ck_attribute edited_private[MAX_TEMPLATE + MAX_OVERRIDES];
	struct ck_attribute edited_public[MAX_TEMPLATE + MAX_OVERRIDES];
	if (edit_template(&private_key_template, &private_key_attribute_count, over_private,
			  n_private, edited_private) ||
	    edit_template(&public_key_template, &public_key_attribute_count, over_public,
			  n_public, edited_public))
		rv = CKR_ARGUMENTS_BAD;
	else
		rv = real->C_GenerateKeyPair(session, mechanism, public_key_template,
					     public_key_attribute_count, private_key_template,
					     private_key_attribute_count, public_key, private_key);
	if (until.tv_sec || until.tv_nsec)
		sleep_until(&until);
	return rv;
}
FWD(C_WrapKey, (ck_session_handle_t session, struct ck_mechanism *mechanism, ck_object_handle_t wrapping_key, ck_object_handle_t key, unsigned char *wrapped_key, unsigned long *wrapped_key_len), (session, mechanism, wrapping_key, key, wrapped_key, wrapped_key_len))
FWD(C_UnwrapKey, (ck_session_handle_t session, struct ck_mechanism *mechanism, ck_object_handle_t unwrapping_key, unsigned char *wrapped_key, unsigned long wrapped_key_len, struct ck_attribute *templ, unsigned long attribute_count, ck_object_handle_t *key), (session, mechanism, unwrapping_key, wrapped_key, wrapped_key_len, templ, attribute_count, key))
/* C_DeriveKey, logged to `derive_log` before it is forwarded. */
static ck_rv_t shim_C_DeriveKey(ck_session_handle_t session, struct ck_mechanism *mechanism,
				ck_object_handle_t base_key, struct ck_attribute *templ,
				unsigned long attribute_count, ck_object_handle_t *key)
{
	struct timespec until;
	ck_rv_t rv = before("C_DeriveKey", &until);
	if (rv != CKR_OK)
		return rv;
	char path[4096];
	pthread_mutex_lock(&lock);
	snprintf(path, sizeof path, "%s", cfg.derive_log);
	pthread_mutex_unlock(&lock);
	if (path[0] && mechanism && mechanism->mechanism == CKM_ECDH1_DERIVE) {
		const struct ck_ecdh1_derive_params *p = mechanism->parameter;
		char line[2 * 256 + 2];
		/* A derive it cannot log fails: a test that asked for the log
		 * must never see fewer opens than there were. */
		if (!p || mechanism->parameter_len != sizeof *p || !p->public_data ||
		    p->public_data_len == 0 || p->public_data_len > 256) {
			fprintf(stderr, "lavd-pkcs11-shim: derive_log: an ECDH1 derive whose parameters it cannot read\n");
			return CKR_GENERAL_ERROR;
		}
		{
			static const char hex[] = "0123456789abcdef";
			size_t n = 0;
			for (unsigned long i = 0; i < p->public_data_len; i++) {
				line[n++] = hex[p->public_data[i] >> 4];
				line[n++] = hex[p->public_data[i] & 15];
			}
			line[n++] = '\n';
			int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
			/* A log that cannot be written fails the call: a test that
			 * asked for it must not see fewer opens than there were. */
			if (fd < 0 || write(fd, line, n) != (ssize_t)n) {
				fprintf(stderr, "lavd-pkcs11-shim: derive_log %s: %s\n", path, strerror(errno));
				if (fd >= 0)
					close(fd);
				return CKR_GENERAL_ERROR;
			}
			close(fd);
		}
	}
	rv = real->C_DeriveKey(session, mechanism, base_key, templ, attribute_count, key);
	if (until.tv_sec || until.tv_nsec)
		sleep_until(&until);
	return rv;
}
FWD(C_SeedRandom, (ck_session_handle_t session, unsigned char *seed, unsigned long seed_len), (session, seed, seed_len))
FWD(C_GenerateRandom, (ck_session_handle_t session, unsigned char *random_data, unsigned long random_len), (session, random_data, random_len))
FWD(C_GetFunctionStatus, (ck_session_handle_t session), (session))
FWD(C_CancelFunction, (ck_session_handle_t session), (session))
FWD(C_WaitForSlotEvent, (ck_flags_t flags, ck_slot_id_t *slot, void *reserved), (flags, slot, reserved))

static ck_rv_t shim_C_Initialize(void *init_args)
{
	return real->C_Initialize(init_args);
}

static ck_rv_t shim_C_Finalize(void *reserved)
{
	return real->C_Finalize(reserved);
}

static ck_rv_t shim_C_GetInfo(struct ck_info *info)
{
	ck_rv_t rv = real->C_GetInfo(info);
	/* The interface this module offers is v2.40's (see load()). */
	if (rv == CKR_OK && info) {
		info->cryptoki_version.major = 2;
		info->cryptoki_version.minor = 40;
	}
	return rv;
}

static ck_rv_t shim_C_GetFunctionList(struct ck_function_list **list);

/* Loads the real module once. Returns 0 on success. */
static int load(void)
{
	if (real)
		return 0;
	const char *path = getenv("LAVD_SHIM_CONFIG");
	snprintf(cfg_path, sizeof cfg_path, "%s", path ? path : "");
	reload_locked(1);
	if (refused)
		return -1;
	if (!cfg.module[0]) {
		fprintf(stderr, "lavd-pkcs11-shim: LAVD_SHIM_CONFIG unset, unreadable, or without `module`\n");
		return -1;
	}
	void *handle = dlopen(cfg.module, RTLD_NOW | RTLD_LOCAL);
	if (!handle) {
		fprintf(stderr, "lavd-pkcs11-shim: %s\n", dlerror());
		return -1;
	}
	ck_rv_t (*get)(struct ck_function_list **) =
		(ck_rv_t (*)(struct ck_function_list **))dlsym(handle, "C_GetFunctionList");
	if (!get || get(&real) != CKR_OK || !real) {
		fprintf(stderr, "lavd-pkcs11-shim: %s has no usable C_GetFunctionList\n", cfg.module);
		real = NULL;
		return -1;
	}
	/* The list handed out is PKCS#11 v2.40's, whatever version the
	 * forwarded module's own list says: a 3.x loader reading a 3.x list
	 * from it would read past its end. */
	shim.version.major = 2;
	shim.version.minor = 40;
#define SET(name) shim.name = shim_##name;
	SET(C_Initialize) SET(C_Finalize) SET(C_GetInfo) SET(C_GetFunctionList)
	FORWARDED(SET)
#undef SET
	return 0;
}

static ck_rv_t shim_C_GetFunctionList(struct ck_function_list **list)
{
	if (!list)
		return CKR_ARGUMENTS_BAD;
	pthread_mutex_lock(&lock);
	int failed = load();
	pthread_mutex_unlock(&lock);
	if (failed)
		return CKR_GENERAL_ERROR;
	*list = &shim;
	return CKR_OK;
}

__attribute__((visibility("default"))) ck_rv_t C_GetFunctionList(struct ck_function_list **list)
{
	return shim_C_GetFunctionList(list);
}
