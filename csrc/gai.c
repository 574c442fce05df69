/* getaddrinfo("graft:NAME"): the endpoint's address (its port when fixed), asked with `resolve`. */
#include "internal.h"

#include <string.h>

EXPORT int getaddrinfo(const char *node, const char *serv, const struct addrinfo *hints, struct addrinfo **res)
{
	ENSURE();
	if (!g_enabled || !node || strncmp(node, "graft:", 6) != 0)
		return real_getaddrinfo(node, serv, hints, res);
	const char *name = node + 6;
	size_t n = strlen(name);
	if (n == 0 || n >= AF_GRAFT_EPNAME_MAX)
		return EAI_NONAME;
	for (size_t i = 0; i < n; i++)
		if (name[i] <= ' ' || name[i] > '~')
			return EAI_NONAME;
	char req[64], out[MAX_MESSAGE + 1];
	int fd;
	if (wire_resolve(req, sizeof(req), name) < 0 || ask(req, &fd, out, sizeof(out)) != D_GRANT)
		return EAI_NONAME;
	/* out: "ok\nNAME type ipv4 addr A port P|dynamic" */
	char *line = strchr(out, '\n');
	if (!line)
		return EAI_NONAME;
	char *words[12], *save = NULL;
	int k = 0;
	for (char *w = strtok_r(line + 1, " \n", &save); w && k < 12; w = strtok_r(NULL, " \n", &save))
		words[k++] = w;
	const char *type = NULL, *addr = NULL, *port = NULL;
	for (int i = 1; i + 1 < k; i += 2) {
		if (!strcmp(words[i], "type"))
			type = words[i + 1];
		else if (!strcmp(words[i], "addr"))
			addr = words[i + 1];
		else if (!strcmp(words[i], "port"))
			port = words[i + 1];
	}
	if (!type || !addr || (strcmp(type, "ipv4") && strcmp(type, "ipv6")))
		return EAI_FAMILY; /* a unix endpoint has no address to resolve */
	struct addrinfo h = { 0 };
	if (hints)
		h = *hints;
	h.ai_flags |= AI_NUMERICHOST;
	h.ai_flags &= ~AI_CANONNAME;
	const char *p = (port && strcmp(port, "dynamic")) ? port : serv;
	if (p == port)
		h.ai_flags |= AI_NUMERICSERV;
	return real_getaddrinfo(addr, p, &h, res);
}
