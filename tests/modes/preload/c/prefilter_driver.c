/* Runs csrc/prefilter.c (the production source, compiled with this driver) on what stdin says:
 *   T N            a new table: the next N lines are Prefilter lines (`bind ...`, `egress ...`)
 *   O VERB FAMILY ADDR PORT V6ONLY     one operation (VERB: bind, connect, sendto)
 * and prints one line per operation: 1 (a rule may apply), 0 (none can), or "bad table". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "prefilter.h"

int main(void)
{
	static char line[512], text[1 << 16];
	struct pf pf = { 0 };
	int ok = 0;
	while (fgets(line, sizeof(line), stdin)) {
		line[strcspn(line, "\n")] = 0;
		if (line[0] == 'T') {
			int n = atoi(line + 2);
			text[0] = 0;
			for (int i = 0; i < n && fgets(line, sizeof(line), stdin); i++)
				strncat(text, line, sizeof(text) - strlen(text) - 1);
			size_t k = strlen(text);
			if (k && text[k - 1] == '\n')
				text[k - 1] = 0;
			if (ok)
				pf_free(&pf);
			ok = pf_parse(text, &pf) == 0;
			continue;
		}
		char verb[16], addr[64];
		int family, port, v6only;
		if (sscanf(line, "O %15s %d %63s %d %d", verb, &family, addr, &port, &v6only) != 5)
			return 2;
		if (!ok) {
			puts("bad table");
			continue;
		}
		int v = !strcmp(verb, "bind") ? PF_BIND : !strcmp(verb, "connect") ? PF_CONNECT : PF_SENDTO;
		printf("%d\n", pf_might(&pf, v, family, addr, port, v6only));
	}
	return 0;
}
